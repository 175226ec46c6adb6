"""The core: the device, the one loader, the three stages and `generate`, limits, random models, the tokenizer,
single-file checkpoints, measuring (time, loads, peak memory), result records and pictures. It imports no other
layer of `helpers`."""
