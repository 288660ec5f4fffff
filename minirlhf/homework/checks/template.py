"""Checks of the ``template`` exercise: ``homework_template`` (data/templates.py)."""
from minirlhf.homework.check import Check

RECORD = {"instruction": "Say hi", "output_a": "Hi!", "output_b": "No.", "preferred": "a"}


def convert(f, x):
    example = f.homework_template(x["record"])  # fields, not the class: a submission defines its own
    return {"prompt": example.prompt, "chosen": example.chosen, "rejected": example.rejected}


CHECKS = [
    Check("preferred = 'a': chosen is output_a", lambda: {"record": RECORD}, convert,
          lambda x, got: {"prompt": "Say hi", "chosen": "Hi!", "rejected": "No."}),
    Check("preferred = 'b': chosen is output_b", lambda: {"record": dict(RECORD, preferred="b")}, convert,
          lambda x, got: {"prompt": "Say hi", "chosen": "No.", "rejected": "Hi!"}),
    Check("an empty output is kept (the loader skips empty pairs itself)",
          lambda: {"record": dict(RECORD, output_b="")}, convert,
          lambda x, got: {"prompt": "Say hi", "chosen": "Hi!", "rejected": ""}, hint="text_field(record, key, True)"),
    Check("preferred = 'c' is a DataError naming the field 'preferred'", lambda: {"record": dict(RECORD, preferred="c")},
          convert, raises=("DataError", "preferred"), hint="choice_field(record, 'preferred', ('a', 'b'))"),
    Check("a missing output_b is an error naming 'output_b'",
          lambda: {"record": {k: v for k, v in RECORD.items() if k != "output_b"}}, convert,
          raises=("Exception", "output_b")),
]
