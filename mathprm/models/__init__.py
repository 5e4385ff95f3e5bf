"""The models: the arithmetic policy and its character tokenizer (`policy`, `tokenizer`), the
process reward model (`prm`), and the `Generator` backends over Hugging Face (`gen_hf`) and vLLM
(`gen_vllm`).
"""
