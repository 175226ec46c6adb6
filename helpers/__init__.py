"""Stable Diffusion, dissected: the small package every notebook imports. Its layers, each importing only the ones
above it in this list:

- `core/`: the device (`accelerator`), the one loader (`models`), the three stages and the one `generate`
  (`stages`), size limits, random models at SD 1.5's shapes, the tokenizer, single-file checkpoints (`ldm`),
  measuring (time, loads, peak memory), result records, pictures;
- `checkpoints/`: getting weights: hub and BitTorrent downloads (`download`, `swarm`), the local hub (`hub`);
- `studies/`: what each notebook measures, one module per study (batching and partial loading: 03;
  interpolation: 04-05; control: 06; latency: 07; dreambooth: 08);
- `serving/`: the widget panel, the web page, prompt-file batch jobs;
- `series/`: the notebook series itself: settings and profiles, the papermill harness and its report, the
  Colab/Kaggle setup cell, the T4 rehearsal;
- `bench/`: `python -m helpers bench NAME`; `toy/`: the toy model's world, oracle, training and weights.
"""

from pathlib import Path

from helpers.core import quiet

PACKAGE_DIR = Path(__file__).resolve().parent
DATA_DIR = PACKAGE_DIR / "data"
SOURCE_NOTEBOOKS_DIR = PACKAGE_DIR.parent / "notebooks"  # the clone's notebooks/ beside the package (editable install)

quiet.install()  # before diffusers or transformers are imported by anything of ours
