"""rnnkit: train, evaluate, sample from and serve recurrent sequence models (RNN, GRU, LSTM, minGRU, minLSTM).

The public surface, for use as a library::

    from rnnkit import RunConfig, prepare_lm_data, train_language_model, load_checkpoint, generate
"""

__version__ = "0.1.0"

from rnnkit.beam import Hypothesis, beam_search  # noqa: E402
from rnnkit.checkpoint import Checkpoint, load_checkpoint  # noqa: E402
from rnnkit.config import DataConfig, ModelConfig, RunConfig, TrainConfig, load_config  # noqa: E402
from rnnkit.data.lm_data import LMData, prepare_lm_data  # noqa: E402
from rnnkit.data.tokenizers import CharTokenizer  # noqa: E402
from rnnkit.errors import RnnkitError  # noqa: E402
from rnnkit.generation import generate, generate_ids, sample_next  # noqa: E402
from rnnkit.models.language_model import LanguageModel  # noqa: E402

# The training names load on first use (PEP 562), so that importing the package for
# inference (the server, `rnnkit generate`) does not pull in the training code.
_TRAINING = {"TrainResult", "train_language_model"}


def __getattr__(name: str):
    if name in _TRAINING:
        from rnnkit.training import lm

        return getattr(lm, name)
    if name == "export_checkpoint":  # ONNX export: torch.onnx and the `export` extra only when asked for
        from rnnkit.export import export_checkpoint

        return export_checkpoint
    raise AttributeError(f"module 'rnnkit' has no attribute {name!r}")


__all__ = [
    "Checkpoint", "CharTokenizer", "DataConfig", "Hypothesis", "LMData", "LanguageModel", "ModelConfig",
    "RnnkitError", "RunConfig", "TrainConfig", "TrainResult", "beam_search", "export_checkpoint", "generate", "generate_ids", "load_checkpoint", "load_config",
    "prepare_lm_data", "sample_next", "train_language_model",
]
