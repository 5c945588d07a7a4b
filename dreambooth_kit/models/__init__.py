"""Where models come from and how they load: a Hub id, a diffusers folder, an A1111/ComfyUI single
file or a built-in model (``builtin:NAME``, looked up in a registry that support packages fill), resolved
once into a ``ModelSource``; the components loaded from it; SD 2.1's own numbers and the samplers a user
can name. The random-weight ``builtin:tiny-sd2`` is built here; the toy world's model registers itself."""
