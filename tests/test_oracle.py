from workbench.toy.quality import oracle_accuracy


def test_oracle_reads_fresh_renders(oracle):
    acc = oracle_accuracy(oracle, n=400)
    assert acc["object"] >= 0.97 and acc["colour"] >= 0.97 and acc["style"] >= 0.97, acc


def test_oracle_probabilities(oracle):
    from workbench.toy.render import render
    from workbench.toy.world import Scene

    p = oracle.probs([render(Scene("moon", "yellow", "plain", ""), seed=5)] * 2)
    assert p["object"].shape == (2, 16)
    assert abs(float(p["style"][0].sum()) - 1) < 1e-5
