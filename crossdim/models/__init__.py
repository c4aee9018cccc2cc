"""Model zoo: Omnia-Net (2D), DS-Net and DX-Net (3D) over any timm encoder."""

from crossdim.models.registry import (
    create_model,
    get_preset,
    list_architectures,
    list_presets,
    register_architecture,
    register_preset,
)

__all__ = [
    "create_model",
    "get_preset",
    "list_architectures",
    "list_presets",
    "register_architecture",
    "register_preset",
    "inflate",
    "load_model",
    "save_model",
]


def __getattr__(name):  # lazy: keep `import crossdim.models` light
    if name == "inflate":
        from crossdim.models.inflate import inflate

        return inflate
    if name in ("load_model", "save_model"):
        from crossdim.models import io

        return getattr(io, name)
    raise AttributeError(name)
