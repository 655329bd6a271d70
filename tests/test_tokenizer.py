from mmr1.tokenizer import IGNORE_INDEX, R1Tokenizer

TEXTS = ["What color is the shape?", "red", "blue", "How many beeps do you hear?", "three", "a red circle is round."]


def make_tokenizer(tmp_path=None):
    return R1Tokenizer.train(TEXTS * 5, vocab_size=300, modalities=["image", "audio"])


def test_chat_format_and_answer_only_labels():
    tok = make_tokenizer()
    ids, labels = tok.encode_example("What color is the shape?", "red", ["image", "audio"])
    assert ids[:4] == [tok.bos_id, tok.user_id, tok.marker_id("image"), tok.marker_id("audio")]
    a = ids.index(tok.assistant_id)
    assert all(label == IGNORE_INDEX for label in labels[: a + 1])
    assert labels[a + 1:] == ids[a + 1:] and ids[-1] == tok.eos_id
    assert tok.decode(ids[a + 1:]) == "red"
    assert tok.encode_prompt("What color is the shape?", ["image", "audio"]) == ids[: a + 1]


def test_text_records_supervise_everything_after_bos():
    tok = make_tokenizer()
    ids, labels = tok.encode_text("a red circle is round.")
    assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
    assert labels == [IGNORE_INDEX] + ids[1:]
    assert tok.decode(ids) == "a red circle is round."


def test_plugin_modality_adds_marker_and_roundtrips(tmp_path):
    tok = make_tokenizer()
    size = tok.vocab_size
    tok.add_modalities(["image", "depth"])
    assert tok.vocab_size == size + 1
    tok.save(tmp_path / "tokenizer.json")
    again = R1Tokenizer.from_file(tmp_path)
    assert again.marker_id("depth") == tok.marker_id("depth")
    assert again.encode("What color is the shape?") == tok.encode("What color is the shape?")
