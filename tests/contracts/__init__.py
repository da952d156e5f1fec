"""The official checkpoints' state-dict contracts (copied from shared/contracts) and helpers to read them."""

import json
from pathlib import Path

HERE = Path(__file__).parent


def read_contract(name: str):
    """(config dict, {key: (shape list, dtype str)}) of a contract file."""
    lines = (HERE / name).read_text().splitlines()
    config = json.loads(next(line for line in lines if line.startswith("# config="))[len("# config="):])
    keys = {}
    for line in lines:
        if line and not line.startswith("#"):
            key, shape, dtype = line.split("\t")
            keys[key] = (json.loads(shape), dtype)
    return config, keys


def state_contract(module):
    return {k: (list(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in module.state_dict().items()}
