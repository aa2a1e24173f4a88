"""One stage on one rank: configuration, weights, tensor-parallel slicing, the model,
sampling, the tokenizer, CPU kernels and the generation loop. No network, no processes."""
