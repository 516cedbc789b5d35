"""Zero-shot scoring in the core: top-k hits, descriptor files, retrieval recall."""

import json

import pytest
import torch

from distill.zeroshot import load_descriptors, retrieval_recall, topk_correct


def test_topk_correct():
    logits = torch.tensor([[0.9, 0.1, 0.0], [0.2, 0.3, 0.5], [0.1, 0.5, 0.4]])
    labels = torch.tensor([0, 1, 2])
    hits = topk_correct(logits, labels, ks=(1, 2, 5))
    assert hits[1].tolist() == [True, False, False]
    assert hits[2].tolist() == [True, True, True]
    assert hits[5].all()  # k larger than the class count means every class


def test_descriptor_file_errors(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps({"circle": ["is round"]}))
    assert load_descriptors(path) == {"circle": ["is round"]}
    with pytest.raises(KeyError, match="no descriptors for classes \\['star'\\]"):
        load_descriptors(path, ["circle", "star"])
    path.write_text(json.dumps(["not", "a", "dict"]))
    with pytest.raises(ValueError, match="must be a JSON object"):
        load_descriptors(path)
    with pytest.raises(FileNotFoundError, match="descriptor file not found"):
        load_descriptors(tmp_path / "missing.json")


def test_retrieval_recall_matches_the_full_similarity_matrix():
    torch.manual_seed(0)
    images = torch.nn.functional.normalize(torch.randn(300, 16), dim=1)
    texts = torch.nn.functional.normalize(images + 0.9 * torch.randn(300, 16), dim=1)
    sim = images @ texts.T
    expected = {}
    for name, scores in (("i2t", sim), ("t2i", sim.T)):
        rank = (scores > scores.diagonal()[:, None]).sum(dim=1)  # how many items beat the paired one
        for k in (1, 5):
            expected[f"{name}_r{k}"] = (rank < k).float().mean().item()
    got = retrieval_recall(images, texts)
    assert got == pytest.approx(expected)
    assert 0.0 < got["i2t_r1"] < got["i2t_r5"] < 1.0
