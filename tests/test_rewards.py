"""Verifiable rewards and the accuracy reported from them."""


def test_accuracy_is_exact_even_where_the_verifier_gives_partial_credit():
    from opd_lightning.rewards import correctness, exact_accuracy

    entry = {"question": "Calculate 2 - 30.", "answer": "-28", "metadata": {"source_dataset": "basic_arithmetic"}}
    assert correctness(["-280"], [entry])[0] > 0.0  # reasoning_gym's partial credit
    assert exact_accuracy(["-280", "-28", "<answer>-28</answer>"], [entry] * 3) == [0.0, 1.0, 1.0]
