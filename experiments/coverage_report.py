"""What share of real architectures' parameters torchapprox quantizes, by model.

    python -m experiments.coverage_report            # a markdown table on stdout

Every model is built from a small config (no download): Hugging Face transformers models
when the package is installed (``pip install transformers``), and models made of torch's
own layers. Two columns: the layer types of torchapprox 0.1 (Linear, Conv1d/2d/3d,
MultiheadAttention) and the registered types of this version, as ``attach`` quantizes
them (a tied weight counts once).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
from torch import nn

import torchapprox as ta

OLD_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


class LSTMTagger(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(5000, 64)
        self.rnn = nn.LSTM(64, 128, num_layers=2, bidirectional=True, batch_first=True)
        self.head = nn.Linear(256, 17)


class GRUSeq2Seq(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(2000, 64)
        self.encoder = nn.GRU(64, 128, batch_first=True)
        self.decoder = nn.GRU(64, 128, batch_first=True)
        self.head = nn.Linear(128, 2000)


class UNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.down = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.Conv2d(32, 64, 3, stride=2, padding=1),
                                  nn.Conv2d(64, 128, 3, stride=2, padding=1))
        self.up = nn.Sequential(nn.ConvTranspose2d(128, 64, 2, stride=2), nn.ConvTranspose2d(64, 32, 2, stride=2),
                                nn.Conv2d(32, 2, 1))


class TinyTransformer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(1000, 64)
        layer = nn.TransformerEncoderLayer(64, 4, 128, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(64, 1000)


def torch_models() -> dict[str, Callable[[], nn.Module]]:
    return {
        "LSTM tagger (Embedding + 2-layer BiLSTM)": LSTMTagger,
        "GRU seq2seq": GRUSeq2Seq,
        "UNet (Conv2d + ConvTranspose2d)": UNet,
        "Transformer encoder (torch.nn)": TinyTransformer,
    }


def transformers_models() -> dict[str, Callable[[], nn.Module]]:
    try:
        import transformers as hf
    except ImportError:
        return {}
    small = {"vocab_size": 1000}
    return {
        "GPT-2 (transformers)": lambda: hf.GPT2LMHeadModel(hf.GPT2Config(
            n_layer=2, n_embd=64, n_head=2, n_positions=128, bos_token_id=0, eos_token_id=0, **small)),
        "BERT (transformers)": lambda: hf.BertModel(hf.BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                                                                   intermediate_size=256, **small)),
        "Llama (transformers)": lambda: hf.LlamaForCausalLM(hf.LlamaConfig(
            hidden_size=64, intermediate_size=172, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
            **small)),
        "T5 (transformers)": lambda: hf.T5ForConditionalGeneration(hf.T5Config(d_model=64, d_ff=256, d_kv=32,
                                                                               num_layers=2, num_heads=2, **small)),
        "ViT (transformers)": lambda: hf.ViTForImageClassification(hf.ViTConfig(
            hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=256, image_size=32,
            patch_size=8)),
    }


def old_share(model: nn.Module) -> float:
    """The share torchapprox 0.1 quantized: weights of Linear, Conv and attention layers."""
    quantized: dict[int, int] = {}
    for module in model.modules():
        if isinstance(module, OLD_TYPES):
            quantized[id(module.weight)] = module.weight.numel()
        elif isinstance(module, nn.MultiheadAttention):
            for name in ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight"):
                tensor = getattr(module, name)
                if tensor is not None:
                    quantized[id(tensor)] = tensor.numel()
    total = sum(p.numel() for p in model.parameters())
    return sum(quantized.values()) / total


def report() -> list[dict]:
    rows = []
    for name, build in {**transformers_models(), **torch_models()}.items():
        torch.manual_seed(0)
        model = build()
        before = old_share(model)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ta.attach(model, 8)
        table = ta.coverage(model)
        now = sum(r["quantized_share"] for r in table)
        floats = [f"{r['layer_type']} ({100 * (r['share'] - r['quantized_share']):.1f}%)" for r in table
                  if r["share"] - r["quantized_share"] > 0.0005]
        rows.append({"model": name, "parameters": sum(p.numel() for p in model.parameters()), "before": before,
                     "now": now, "float": ", ".join(floats)})
    return rows


def main() -> None:
    print("| model | parameters | quantized, 0.1 types | quantized now | in float now (biases, norms, ...) |")
    print("|---|---:|---:|---:|---|")
    for row in report():
        print(f"| {row['model']} | {row['parameters']:,} | {100 * row['before']:.1f}% | {100 * row['now']:.1f}% | "
              f"{row['float']} |")


if __name__ == "__main__":
    main()
