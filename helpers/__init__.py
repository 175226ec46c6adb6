"""Stable Diffusion, dissected: the small package every notebook imports."""

from helpers import quiet

quiet.install()  # before diffusers or transformers are imported by anything of ours
