"""`export.gguf`: the GGUF types a recipe may ask for. `publish/gguf.py` makes them with
llama.cpp's tools; the recipe only checks the names."""

CONVERTER_TYPES = ("f16", "bf16", "q8_0")  # written directly by convert_hf_to_gguf.py
QUANTIZE_TYPES = ("q4_0", "q4_1", "q5_0", "q5_1", "q2_k", "q3_k_s", "q3_k_m", "q3_k_l", "q4_k_s", "q4_k_m",
                  "q5_k_s", "q5_k_m", "q6_k")  # need the built llama-quantize
GGUF_TYPES = CONVERTER_TYPES + QUANTIZE_TYPES
