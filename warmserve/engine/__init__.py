"""A compact paged-KV LLM engine (Llama family). Block bookkeeping here is torch-free."""
