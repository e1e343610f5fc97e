"""The recipe layer (DESIGN.md, "Floors of the house"), with `align.cli`: read a validated config, build each
component from its section, wire concrete kinds together (a reward-model ensemble from `reward_models/`, the toy
world's gold reward, a user's `module:function`) and run.

    train            `align train`: `train` runs the recipe of the objective's family; `train_pairs` (f-DPO, SamPO)
    train_on_policy  `align train` for the on_policy family (f-DPG): prompts, sampler, reward, target
    quickstart       `align quickstart`: the toy world from SFT to a measured f-DPO policy
    common           what the two `align train` recipes share

Only this layer, `align.cli` and the studies (`eval/studies/`) may import every package; the core (the rest of
`align/`) and the floor built on it (`reward_models/`, `eval/`) never import it (tests/test_layers.py).
"""
