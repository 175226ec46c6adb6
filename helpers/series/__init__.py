"""The notebook series: settings and profiles, the papermill harness (`run`) with its progress and report, the
Colab/Kaggle setup cell and badges (`colab`), and the T4 rehearsal (`rehearse`)."""
