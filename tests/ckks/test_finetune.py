"""Fine-tuning a CKKS program with its polynomials in place: training recovers accuracy that
damaged weights lost, and the compiler runs it where fitted polynomials cost too much."""

import copy

import numpy as np

from gravel.ckks.compile import CkksOptions, compile_ckks
from gravel.ckks.finetune import finetune_program


def test_training_with_the_polynomials_recovers_accuracy(digits, relu_model):
    compiled, _ = compile_ckks(relu_model, digits.x_train[:300], digits.y_train[:300], CkksOptions(degree=2))
    program = copy.deepcopy(compiled.program)
    rng = np.random.default_rng(0)
    first = next(st for st in program.stages if st.weight is not None)
    first.weight = first.weight + rng.normal(0, 3 * first.weight.std(), first.weight.shape)
    damaged = float((program.simulate(digits.x_test).argmax(1) == digits.y_test).mean())
    result = finetune_program(program, digits.x_train, digits.y_train, epochs=5, lr=3e-3)
    tuned = float((program.simulate(digits.x_test).argmax(1) == digits.y_test).mean())
    assert result["accuracy_after"] > result["accuracy_before"]
    assert damaged < 0.8 and tuned > damaged + 0.1  # on held-out samples too


def test_the_compiler_fine_tunes_when_the_polynomials_cost_too_much(digits, relu_model):
    # max_loss below zero: any polynomial "costs too much", so the pass runs
    options = CkksOptions(degree=2, max_loss=-1.0, finetune_epochs=2)
    compiled, _ = compile_ckks(relu_model, digits.x_train[:300], digits.y_train[:300], options,
                               finetune_data=(digits.x_train, digits.y_train))
    assert compiled.report["finetune"]["epochs"] == 2
    assert any("fine-tuned 2 epochs" in n for n in compiled.notes)
    sim = compiled.program.simulate(digits.x_train[:300])
    bound = np.max(np.abs(sim - compiled.program.out_offset)) / abs(compiled.program.out_scale)
    assert compiled.report["max_abs_decrypted"] == float(bound)  # the parameters are planned on it
    assert float((compiled.program.simulate(digits.x_test).argmax(1) == digits.y_test).mean()) > 0.9
