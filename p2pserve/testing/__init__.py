"""What p2pserve's tests and benchmarks share: real peers started as a user starts them
(``swarm``), the transformers reference every answer is measured against (``reference``),
float tolerances derived from the computation (``tolerance``), the machine a figure
was measured on (``machine``) and llama.cpp, the engine benchmarks set beside ours
(``llamacpp``). Nothing in the serving path imports it."""
