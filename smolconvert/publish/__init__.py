"""What an artifact folder carries for people and for publishing, beside what a runtime loads."""

CARD_FILE = "README.md"  # the Hugging Face model card (publish/card.py)
MODELFILE = "Modelfile"  # Ollama's import recipe beside a GGUF (publish/ollama.py)
# Not counted in an artifact's size: no runtime loads them, and a size budget (gguf:auto's
# size_mb, a release gate) is about the model's bytes.
PUBLISH_FILES = frozenset({CARD_FILE, MODELFILE})


def runtime_bytes(files: list[dict]) -> int:
    """The bytes of an artifact's files (artifact.json's `files`) that a runtime loads."""
    return sum(int(f["size_bytes"]) for f in files if f["path"] not in PUBLISH_FILES)
