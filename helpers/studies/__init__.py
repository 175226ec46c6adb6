"""What each notebook measures, one module per study: batching and partial loading (03), interpolation (04, 05),
ControlNet and aspect ratios (06), latency (07, with its OpenVINO engine), DreamBooth with LoRA (08)."""
