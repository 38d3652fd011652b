"""gpt2_book: GPT-2 built from scratch in PyTorch, one chapter at a time.

The modules are generated from the chapter notebooks in ``notebooks/``; this file only gathers
the names a reader uses most.
"""

from gpt2_book.attention import CausalSelfAttention
from gpt2_book.block import Block
from gpt2_book.gpt import GPT, GPTConfig
from gpt2_book.mlp import MLP

__all__ = ["Block", "CausalSelfAttention", "GPT", "GPTConfig", "MLP"]
__version__ = "0.1.0"
