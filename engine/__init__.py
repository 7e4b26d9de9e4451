"""A hand-written Qwen3 LoRA post-training engine (no transformers in engine code)."""
from engine.model.weights import load_model, save_model
from engine.model.qwen3_config import Qwen3Config
from engine.errors import EngineError
from engine.model.kv_cache import KVCache
from engine.model.qwen3 import CausalLMOutput, Qwen3ForCausalLM
from engine.model.tokenizer import ChatTokenizer, load_tokenizer

__all__ = ["load_model", "save_model", "Qwen3Config", "EngineError", "KVCache", "CausalLMOutput",
           "Qwen3ForCausalLM", "ChatTokenizer", "load_tokenizer"]
