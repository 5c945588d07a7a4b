"""The samplers (diffusers schedulers) a user can name: for generation (`--scheduler`) and for class
images (`prior.sampler`). Plain data, no torch: the config checks names against it."""

from __future__ import annotations

# our name -> (diffusers class, extra config, A1111's sampler name)
SCHEDULERS: dict[str, tuple[str, dict, str]] = {
    "dpmpp_2m": (
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "dpmsolver++", "solver_order": 2},
        "DPM++ 2M",
    ),
    "ddim": ("DDIMScheduler", {}, "DDIM"),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}, "Euler a"),
    "euler": ("EulerDiscreteScheduler", {}, "Euler"),
    "ddpm": ("DDPMScheduler", {}, "DDPM"),
    "pndm": ("PNDMScheduler", {"skip_prk_steps": True}, "PLMS"),
}
