"""Argument checks shared by the public ops and the reference.

Every check raises with a message that names the offending argument. The C++ kernels
repeat the cheap checks with ``TORCH_CHECK`` so that ``torch.ops.tpswarp.*`` called
directly is safe too.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
MODES = ("bilinear", "nearest")
PADDING_MODES = ("zeros", "border", "reflection")
REDUCTIONS = ("mean", "sum", "none")


def _fmt_shape(t: torch.Tensor) -> str:
    return "(" + ", ".join(str(s) for s in t.shape) + ")"


def check_tensor(name: str, t, op: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: `{name}` must be a torch.Tensor, got {type(t).__name__}")


def check_float(name: str, t: torch.Tensor, op: str) -> None:
    check_tensor(name, t, op)
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{op}: `{name}` must have a floating dtype (float16, bfloat16, float32, float64), "
            f"got {t.dtype}"
        )


def check_dim(name: str, t: torch.Tensor, dim: int, layout: str, op: str) -> None:
    if t.dim() != dim:
        raise ValueError(
            f"{op}: `{name}` must be {dim}-D {layout}, got shape {_fmt_shape(t)}"
        )


def check_same_device(op: str, **tensors: Optional[torch.Tensor]) -> None:
    named = [(k, v) for k, v in tensors.items() if v is not None]
    if not named:
        return
    first_name, first = named[0]
    for name, t in named[1:]:
        if t.device != first.device:
            raise RuntimeError(
                f"{op}: `{name}` is on {t.device} but `{first_name}` is on {first.device}; "
                "all tensor arguments must be on the same device"
            )


def check_choice(name: str, value, choices: Sequence[str], op: str) -> None:
    if value not in choices:
        raise ValueError(f"{op}: `{name}` must be one of {list(choices)}, got {value!r}")


def check_points(name: str, t: torch.Tensor, op: str, batch: Optional[int] = None) -> None:
    check_float(name, t, op)
    if t.dim() != 3 or t.shape[-1] != 2:
        raise ValueError(f"{op}: `{name}` must have shape (B, n, 2), got {_fmt_shape(t)}")
    if batch is not None and t.shape[0] != batch:
        raise ValueError(
            f"{op}: batch size mismatch: `{name}` has {t.shape[0]} items, expected {batch}"
        )


def check_tps_solve(src, dst, reg) -> None:
    op = "tps_solve"
    check_points("src", src, op)
    check_points("dst", dst, op)
    if src.shape != dst.shape:
        raise ValueError(
            f"{op}: `src` {_fmt_shape(src)} and `dst` {_fmt_shape(dst)} must have the same shape"
        )
    if src.shape[1] < 3:
        raise ValueError(f"{op}: need at least 3 control points, `src` has n={src.shape[1]}")
    check_same_device(op, src=src, dst=dst)
    if not isinstance(reg, (int, float)) or isinstance(reg, bool) or not reg >= 0.0:
        raise ValueError(f"{op}: `reg` must be a non-negative number, got {reg!r}")


def check_tps_params(op: str, src, params, batch: Optional[int] = None) -> None:
    check_points("src", src, op, batch)
    check_float("params", params, op)
    n = src.shape[1]
    if params.dim() != 3 or params.shape[1:] != (n + 3, 2):
        raise ValueError(
            f"{op}: `params` must have shape (B, n + 3, 2) = ({src.shape[0]}, {n + 3}, 2) "
            f"for `src` {_fmt_shape(src)}, got {_fmt_shape(params)}"
        )
    if params.shape[0] != src.shape[0]:
        raise ValueError(
            f"{op}: batch size mismatch: `params` has {params.shape[0]} items, "
            f"`src` has {src.shape[0]}"
        )


def check_tps_transform(points, src, params) -> None:
    op = "tps_transform"
    check_points("points", points, op)
    check_tps_params(op, src, params, batch=points.shape[0])
    check_same_device(op, points=points, src=src, params=params)


def check_size(op: str, size) -> None:
    if size is None:
        return
    if (
        not isinstance(size, (tuple, list))
        or len(size) != 2
        or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in size)
    ):
        raise ValueError(f"{op}: `size` must be None or a pair of positive ints (H, W), got {size!r}")


def check_tps_warp(image, src, params, mode, padding_mode, fill, size) -> None:
    op = "tps_warp"
    check_tensor("image", image, op)
    check_dim("image", image, 4, "(B, C, H, W)", op)
    check_choice("mode", mode, MODES, op)
    check_choice("padding_mode", padding_mode, PADDING_MODES, op)
    if image.dtype not in FLOAT_DTYPES:
        if mode != "nearest" or image.dtype == torch.bool or image.is_complex():
            raise TypeError(
                f"{op}: `image` of dtype {image.dtype} needs mode='nearest' and an integer dtype; "
                "bilinear sampling takes float16, bfloat16, float32 or float64"
            )
    if not isinstance(fill, (int, float)) or isinstance(fill, bool):
        raise TypeError(f"{op}: `fill` must be a number, got {type(fill).__name__}")
    check_tps_params(op, src, params, batch=image.shape[0])
    check_same_device(op, image=image, src=src, params=params)
    check_size(op, size)


def check_photometric_jitter(image, brightness, saturation, hue, contrast, permutation, check_values=True) -> None:
    """``check_values`` also checks that the permutation rows are permutations (reads the data)."""
    op = "photometric_jitter"
    check_float("image", image, op)
    if image.dim() != 4 or image.shape[1] != 3:
        raise ValueError(f"{op}: `image` must have shape (B, 3, H, W) RGB, got {_fmt_shape(image)}")
    B = image.shape[0]
    for name, p in (("brightness", brightness), ("saturation", saturation), ("hue", hue),
                    ("contrast", contrast)):
        check_float(name, p, op)
        if p.shape != (B,):
            raise ValueError(
                f"{op}: `{name}` must have shape (B,) = ({B},), one value per image, "
                f"got {_fmt_shape(p)}"
            )
    if permutation is not None:
        check_tensor("permutation", permutation, op)
        if permutation.dtype != torch.int64:
            raise TypeError(f"{op}: `permutation` must be int64, got {permutation.dtype}")
        if permutation.shape != (B, 3):
            raise ValueError(
                f"{op}: `permutation` must have shape (B, 3) = ({B}, 3), got {_fmt_shape(permutation)}"
            )
    check_same_device(op, image=image, brightness=brightness, saturation=saturation, hue=hue,
                      contrast=contrast, permutation=permutation)
    if check_values and permutation is not None:
        ok = torch.sort(permutation, dim=1).values == torch.arange(3, device=permutation.device)
        bad = (~ok.all(dim=1)).nonzero().flatten().tolist()
        if bad:
            raise ValueError(
                f"{op}: `permutation` rows must be permutations of (0, 1, 2); "
                f"row {bad[0]} is {permutation[bad[0]].tolist()}"
            )


def check_kl_inputs(op: str, student_logits, teacher, reduction) -> None:
    check_float("student_logits", student_logits, op)
    check_float("teacher", teacher, op)
    if student_logits.dim() < 2:
        raise ValueError(
            f"{op}: `student_logits` must have shape (B, C, *spatial), got {_fmt_shape(student_logits)}"
        )
    check_choice("reduction", reduction, REDUCTIONS, op)


def check_kl_size(op: str, student_logits, teacher, size) -> None:
    """The ``size=`` rules of the KL ops: two positive ints; 4-D student and teacher that agree
    in batch size and classes (their spatial sizes may differ: both are resized to ``size``)."""
    check_size(op, size)
    for name, t in (("student_logits", student_logits), ("teacher", teacher)):
        if t.dim() != 4:
            raise ValueError(
                f"{op}: `size` needs 4-D (B, C, H, W) inputs (2-D spatial only), but `{name}` has shape "
                f"{_fmt_shape(t)}"
            )
    if teacher.shape[:2] != student_logits.shape[:2]:
        raise ValueError(
            f"{op}: `teacher` {_fmt_shape(teacher)} and `student_logits` {_fmt_shape(student_logits)} "
            "must agree in batch size and classes"
        )


def output_spatial(student_logits: torch.Tensor, size) -> tuple:
    """Spatial shape of the loss: ``size`` when given, else the student's."""
    return tuple(int(s) for s in size) if size is not None else tuple(student_logits.shape[2:])


def check_masked_kl_div(student_logits, teacher, mask, reduction, size=None) -> None:
    op = "masked_kl_div"
    check_kl_inputs(op, student_logits, teacher, reduction)
    if size is None:
        if teacher.shape != student_logits.shape:
            raise ValueError(
                f"{op}: `teacher` {_fmt_shape(teacher)} must have the shape of `student_logits` "
                f"{_fmt_shape(student_logits)}"
            )
    else:
        check_kl_size(op, student_logits, teacher, size)
    if mask is not None:
        check_tensor("mask", mask, op)
        if mask.dtype != torch.bool and mask.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{op}: `mask` must be bool or floating, got {mask.dtype}")
        B = student_logits.shape[0]
        spatial = output_spatial(student_logits, size)
        if tuple(mask.shape) not in ((B, *spatial), (B, 1, *spatial)):
            where = "the output size `size`" if size is not None else "the logits"
            raise ValueError(
                f"{op}: `mask` must have shape (B, *spatial) = {(B, *spatial)} or "
                f"(B, 1, *spatial) with spatial of {where}, got {_fmt_shape(mask)}"
            )
    check_same_device(op, student_logits=student_logits, teacher=teacher, mask=mask)


def check_warped_kl_div(student_logits, teacher, src, params, reduction, size=None) -> None:
    op = "warped_kl_div"
    check_kl_inputs(op, student_logits, teacher, reduction)
    if size is not None:
        check_kl_size(op, student_logits, teacher, size)
    check_dim("student_logits", student_logits, 4, "(B, C, H, W)", op)
    check_dim("teacher", teacher, 4, "(B, C, H, W)", op)
    if teacher.shape[:2] != student_logits.shape[:2]:
        raise ValueError(
            f"{op}: `teacher` {_fmt_shape(teacher)} and `student_logits` "
            f"{_fmt_shape(student_logits)} must agree in batch size and classes"
        )
    check_tps_params(op, src, params, batch=student_logits.shape[0])
    check_same_device(op, student_logits=student_logits, teacher=teacher, src=src, params=params)


def mask_to_weights(mask: Optional[torch.Tensor], batch: int, spatial: Sequence[int]) -> Optional[torch.Tensor]:
    """Normalize a bool/float mask of shape (B, *spatial) or (B, 1, *spatial) to (B, *spatial)."""
    if mask is None:
        return None
    if mask.dim() == len(spatial) + 2:
        mask = mask.squeeze(1)
    return mask
