"""Stable Diffusion, dissected: the small package every notebook imports."""
