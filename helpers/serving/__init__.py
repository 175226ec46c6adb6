"""Front ends on the core: the ipywidgets panel (`ui`, `interactive`), the Gradio web page (`app`), prompt-file batch
jobs across processes (`batch`)."""
