"""The shared core: what every stage needs and nothing stage-specific. No torch at import.

- ``core.files``: atomic folders (``building``), atomic JSON (``write_json``);
- ``core.hashing``: file and folder hashes, ``digest`` of JSON-able objects, ``flatten``;
- ``core.chat``: chat examples -> token ids with response masks, batches (torch imported when batching);
- ``core.jsonl``: users' JSONL data (``messages`` or ``prompt``/``completion`` lines);
- ``core.onnx_files``: the names and byte count of an exported ONNX folder.
- ``core.offline``: bitsandbytes imported without its Hub kernel download (``import_bitsandbytes``).

Layers above import this one; it imports none of them (``tests/test_layers.py``).
"""
