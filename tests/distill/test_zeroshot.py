"""Zero-shot scoring in the core: top-k hits, descriptor files, retrieval recall."""

import json

import pytest
import torch

from distill.zeroshot import labelled_items, load_descriptors, retrieval_recall, topk_correct, zero_shot_hits


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


def test_retrieval_recall_with_distinct_captions_is_the_pairwise_metric():
    torch.manual_seed(0)
    images = torch.nn.functional.normalize(torch.randn(300, 16), dim=1)
    texts = torch.nn.functional.normalize(images + 0.9 * torch.randn(300, 16), dim=1)
    assert retrieval_recall(images, texts, captions=[f"caption {i}" for i in range(300)]) == retrieval_recall(
        images, texts
    )


def test_retrieval_recall_per_unique_caption():
    # Items 0 and 1 share a caption (so the same caption embedding); items 2 and 3 have their own.
    images = torch.tensor([[1.0, 0, 0], [0.6, 0.8, 0], [0.0, 1, 0], [0.0, 0, 1]])
    texts = torch.tensor([[0.6, 0.8, 0], [0.6, 0.8, 0], [0.0, 1, 0], [0.0, 0, 1]])
    captions = ["a red circle", "a red circle", "a blue star", "a green ring"]
    pairwise = retrieval_recall(images, texts, ks=(1,))
    by_caption = retrieval_recall(images, texts, ks=(1,), captions=captions)
    # Pairwise, images 0 and 1 rank the two identical captions in a tie: one of them is "wrong";
    # caption 0 ranks image 1 first (the other image of its caption): a miss.
    assert pairwise["i2t_r1"] < 1.0 and pairwise["t2i_r1"] == pytest.approx(3 / 4)
    # Per caption, every image ranks its own caption first and every caption an image of its own.
    assert by_caption == {"i2t_r1": 1.0, "t2i_r1": 1.0}
    with pytest.raises(ValueError, match="3 captions for 4 image-text pairs"):
        retrieval_recall(images, texts, captions=captions[:3])


def test_zero_shot_hits_never_scores_a_negative_label():
    bank = torch.eye(3)
    images = torch.eye(3)[[0, 2]]  # the second image looks like class 2, the last class
    # Before, label -1 indexed the last class and this item counted as right.
    with pytest.raises(ValueError, match="1 of 2 labels are negative"):
        zero_shot_hits(images, bank, torch.tensor([0, -1]), ks=(1,))
    with pytest.raises(ValueError, match="label 3 is not a row of the 3-class bank"):
        zero_shot_hits(images, bank, torch.tensor([0, 3]), ks=(1,))
    assert zero_shot_hits(images, bank, torch.tensor([0, 2]), ks=(1,))[1].tolist() == [True, True]


def test_labelled_items():
    assert labelled_items(torch.tensor([0, 1]), allowed=False) is None
    assert labelled_items(torch.tensor([0, -1, 2]), allowed=True).tolist() == [True, False, True]
    with pytest.raises(ValueError, match="1 of 3 test items have label -1.*allows_unlabelled is False"):
        labelled_items(torch.tensor([0, -1, 2]), allowed=False, what="test items")
