"""A second quantizer family, registered as any user's would be: a fixed clipping range."""

import numbers

import torch

import torchapprox as ta
from torchapprox.quantizers import reference


@ta.register_quantizer("fixed_clip")
class FixedClip(ta.ApproxQuantizer):
    """Symmetric, per tensor, with the constant range [-clip, clip] (``options={"clip": c}``):
    ``scale = clip / (2^(b-1) - 1)``, values beyond the range clamp to the grid's ends."""

    @classmethod
    def check_spec(cls, spec) -> None:
        clip = spec.option("clip")
        if isinstance(clip, bool) or not isinstance(clip, numbers.Real) or not clip > 0:
            raise ValueError(f"QuantSpec `options['clip']` must be a number > 0 for the 'fixed_clip' family, "
                             f"got {clip!r}")
        if spec.grid != "signed" or spec.granularity != "per_tensor":
            raise ValueError("the 'fixed_clip' family is signed and per tensor")

    def compute_qparams(self, x: torch.Tensor) -> ta.QParams:
        top = reference.int_max(self.bitwidth)
        scale = torch.tensor(float(self.spec.option("clip")) / top, dtype=reference.compute_dtype(x.dtype),
                             device=x.device)
        return ta.QParams(scale, -top, top, constant=True, may_clamp=True)


def fixed_clip_reference(x: torch.Tensor, bits: int, clip: float) -> torch.Tensor:
    """The family's values, written independently: ATen's own fake quantization."""
    top = reference.int_max(bits)
    return torch.fake_quantize_per_tensor_affine(x.detach().float(), clip / top, 0, -top, top).to(x.dtype)
