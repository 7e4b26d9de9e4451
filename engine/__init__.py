"""A hand-written Qwen3 LoRA post-training engine (no transformers in engine code)."""
from .checkpoint import load_model, save_model
from .config import Qwen3Config
from .errors import EngineError
from .kv_cache import KVCache
from .model import CausalLMOutput, Qwen3ForCausalLM
from .tokenizer import ChatTokenizer, load_tokenizer

__all__ = ["load_model", "save_model", "Qwen3Config", "EngineError", "KVCache", "CausalLMOutput",
           "Qwen3ForCausalLM", "ChatTokenizer", "load_tokenizer"]
