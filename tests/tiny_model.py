"""A tiny random Qwen3 with a tokenizer trained in-process: exercises the real
from_pretrained / chat template / generate code paths on CPU in well under a second."""

from __future__ import annotations

from pathlib import Path

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CORPUS = [
    "hello there, how are you today?",
    "你好，今天的星星很亮喔～",
    "The lighthouse keeper draws maps of the stars.",
    "謝謝你來看直播！我們一起畫星圖吧。",
    "system user assistant good night see you tomorrow",
] * 20


def build_tiny_qwen3(target: Path, seed: int = 0) -> Path:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM

    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    raw.train_from_iterator(CORPUS, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=raw, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        bos_token=None, unk_token=None,
    )
    tokenizer.chat_template = CHATML
    torch.manual_seed(seed)
    config = Qwen3Config(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        max_position_embeddings=1024, tie_word_embeddings=False,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
    )
    model = Qwen3ForCausalLM(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)
    return target


def build_tiny_bert(target: Path) -> Path:
    """A tiny random BERT encoder + WordPiece tokenizer (hidden 384, like MiniLM's output)."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizerFast

    target.mkdir(parents=True, exist_ok=True)
    words = sorted({w for line in CORPUS for w in line.replace("，", " ").split()})
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words, *"你好星燈塔謝"]
    (target / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    BertTokenizerFast(vocab_file=str(target / "vocab.txt")).save_pretrained(target)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(vocab), hidden_size=384, num_hidden_layers=1,
                        num_attention_heads=4, intermediate_size=256,
                        max_position_embeddings=512)
    BertModel(config).save_pretrained(target)
    return target


def build_tiny_last_token_embedder(target: Path, query_prompt: str) -> Path:
    """A sentence-transformers model with Qwen3-Embedding's shape: last-token pooling, a
    query instruction in its config, normalised output (the tiny Qwen3 as its encoder)."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import (
        Normalize,
        Pooling,
        Transformer,
    )

    # Plain text in (no chat-message modality), as an embedding model takes it.
    encoder = Transformer(str(build_tiny_qwen3(target / "encoder")), modality_config={
        "text": {"method": "forward", "method_output_name": "last_hidden_state"}},
        module_output_name="token_embeddings")
    pooling = Pooling(encoder.get_embedding_dimension(), pooling_mode="lasttoken")
    model = SentenceTransformer(modules=[encoder, pooling, Normalize()],
                                prompts={"query": query_prompt})
    model.save(str(target / "embedder"))
    return target / "embedder"
