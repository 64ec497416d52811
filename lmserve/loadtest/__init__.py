"""Load generators and measurement tools (`lmserve bench ...`), shipped with lmserve as a runtime
feature; the top-level `benchmarks/` directory instead holds the scripts that compare lmserve with
its peers (llama.cpp, transformers) and `benchmarks/RESULTS.md`, their figures."""
