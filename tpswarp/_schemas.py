"""Schemas of the tpswarp ops. The C++ library (csrc/ops/*.cpp) defines the same strings;
when the extension is absent they are defined here. tests/test_registration.py checks both agree."""

SCHEMAS = {
    "tps_solve": "tps_solve(Tensor src, Tensor dst, float reg=0., bool check_singular=True) -> Tensor",
    "_tps_solve_backward": (
        "_tps_solve_backward(Tensor grad_params, Tensor src, Tensor dst, Tensor params, float reg, "
        "bool[2] output_mask) -> (Tensor, Tensor)"
    ),
    "tps_transform": "tps_transform(Tensor points, Tensor src, Tensor params) -> Tensor",
    "_tps_transform_backward": (
        "_tps_transform_backward(Tensor grad_out, Tensor points, Tensor src, Tensor params, "
        "bool[3] output_mask) -> (Tensor, Tensor, Tensor)"
    ),
    "tps_warp": (
        "tps_warp(Tensor image, Tensor src, Tensor params, str mode=\"bilinear\", "
        "str padding_mode=\"zeros\", bool align_corners=False, float fill=0., int[]? size=None) "
        "-> (Tensor, Tensor)"
    ),
    "_tps_warp_backward": (
        "_tps_warp_backward(Tensor grad_out, Tensor image, Tensor src, Tensor params, str mode, "
        "str padding_mode, bool align_corners, float fill, int[]? size, bool[3] output_mask) "
        "-> (Tensor, Tensor, Tensor)"
    ),
    "photometric_jitter": (
        "photometric_jitter(Tensor image, Tensor brightness, Tensor saturation, Tensor hue, "
        "Tensor contrast, Tensor? permutation=None, bool clamp=False) -> Tensor"
    ),
    "_photometric_jitter_backward": (
        "_photometric_jitter_backward(Tensor grad_out, Tensor image, Tensor brightness, "
        "Tensor saturation, Tensor hue, Tensor contrast, Tensor? permutation, bool clamp, "
        "bool[5] output_mask) -> (Tensor, Tensor, Tensor, Tensor, Tensor)"
    ),
    "masked_kl_div": (
        "masked_kl_div(Tensor student_logits, Tensor teacher, Tensor? mask=None, "
        "bool teacher_is_logits=False, str reduction=\"mean\", int[]? size=None) -> Tensor"
    ),
    "_masked_kl_div_backward": (
        "_masked_kl_div_backward(Tensor grad_loss, Tensor student_logits, Tensor teacher, "
        "Tensor? mask, bool teacher_is_logits, str reduction, int[]? size, bool[2] output_mask) -> (Tensor, Tensor)"
    ),
    "_masked_kl_div_with_grad": (
        "_masked_kl_div_with_grad(Tensor student_logits, Tensor teacher, Tensor? mask, bool teacher_is_logits, "
        "str reduction, int[]? size) -> (Tensor, Tensor)"
    ),
    "_masked_kl_div_with_stats": (
        "_masked_kl_div_with_stats(Tensor student_logits, Tensor teacher, Tensor? mask, bool teacher_is_logits, "
        "str reduction) -> (Tensor, Tensor)"
    ),
    "_masked_kl_div_backward_stats": (
        "_masked_kl_div_backward_stats(Tensor grad_loss, Tensor student_logits, Tensor teacher, Tensor? mask, "
        "Tensor stats, bool teacher_is_logits, str reduction) -> Tensor"
    ),
    "warped_kl_div": (
        "warped_kl_div(Tensor student_logits, Tensor teacher, Tensor src, Tensor params, "
        "bool teacher_is_logits=False, bool align_corners=False, str reduction=\"mean\", int[]? size=None) -> Tensor"
    ),
    "_warped_kl_div_backward": (
        "_warped_kl_div_backward(Tensor grad_loss, Tensor student_logits, Tensor teacher, "
        "Tensor src, Tensor params, bool teacher_is_logits, bool align_corners, str reduction, "
        "int[]? size, bool[4] output_mask) -> (Tensor, Tensor, Tensor, Tensor)"
    ),
    "_warped_kl_div_with_grad": (
        "_warped_kl_div_with_grad(Tensor student_logits, Tensor teacher, Tensor src, Tensor params, "
        "bool teacher_is_logits, bool align_corners, str reduction, int[]? size) -> (Tensor, Tensor)"
    ),
    "_warped_kl_div_with_stats": (
        "_warped_kl_div_with_stats(Tensor student_logits, Tensor teacher, Tensor src, Tensor params, "
        "bool teacher_is_logits, bool align_corners, str reduction) -> (Tensor, Tensor)"
    ),
    "_warped_kl_div_backward_stats": (
        "_warped_kl_div_backward_stats(Tensor grad_loss, Tensor student_logits, Tensor teacher, Tensor src, "
        "Tensor params, Tensor stats, bool teacher_is_logits, bool align_corners, str reduction) -> Tensor"
    ),
}

PUBLIC_OPS = [name for name in SCHEMAS if not name.startswith("_")]
