"""attnzoo: a model zoo for sparse and efficient attention.

import zoo
model = zoo.create("favit_b0", num_classes=10)
zoo.list_models("favit*")
zoo.model_info("favit_b0")
"""

from zoo import vision as _vision  # noqa: F401  (registers FaViT with timm once timm is imported)
from zoo.registry import create, list_models, model_info

__version__ = "0.1.0"
__all__ = ["__version__", "create", "list_models", "model_info"]
