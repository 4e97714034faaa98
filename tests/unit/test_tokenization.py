from pathlib import Path

from sif_inference.tokenization import TextTokenizer


def tokenizer(models_dir: Path) -> TextTokenizer:
    return TextTokenizer.from_file(models_dir / "all-minilm-l6-v2" / "1" / "tokenizer.json", max_length=256)


def test_one_word_costs_three_tokens_not_128(models_dir):
    tok = tokenizer(models_dir)
    (enc,) = tok.encode(["hello"])
    assert enc.ids == [101, 7592, 102]  # [CLS] hello [SEP]
    assert not tok.was_truncated(enc)


def test_batch_is_padded_to_its_longest_input_only(models_dir):
    tok = tokenizer(models_dir)
    batch = tok.pad(tok.encode(["hello", "hello world again"]))
    assert batch.input_ids.shape == (2, 5)
    assert batch.attention_mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    assert batch.input_ids[0, 3:].tolist() == [0, 0]
    assert batch.token_type_ids.sum() == 0


def test_truncates_at_the_model_max_length_and_reports_it(models_dir):
    tok = tokenizer(models_dir)
    long, short = tok.encode([" ".join(["word"] * 1000), "short text"])
    assert len(long.ids) == 256
    assert long.ids[-1] == 102
    assert tok.was_truncated(long)
    assert not tok.was_truncated(short)


def test_lowercases_like_the_uncased_model(models_dir):
    tok = tokenizer(models_dir)
    a, b = tok.encode(["Hello World", "hello world"])
    assert a.ids == b.ids
