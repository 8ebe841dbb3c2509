"""The label of a position that is not a training target: prompt tokens, padding, and the first
token of each sample in a packed row. It is the value `torch.nn.functional.cross_entropy`
ignores by default, so every loss in the harness skips these positions without a mask."""

IGNORE_INDEX = -100
