"""What the config dataclasses share: errors worded by field, the check of positive fields, loading from a
checkpoint's dict."""
import re
from dataclasses import fields


class ConfigError(ValueError):
    """An impossible value of a config field, worded by fields: "n_embd 30 must divide by n_head 4.".

    The message names any other field in backticks (`n_head`), so that a script can word it all by its flags
    (cli.run_script: "--n-embd 30 must divide by --n-head 4.").
    """

    def __init__(self, field, message):
        self.field, self.message = field, message
        super().__init__(self.worded(lambda name: name))

    def worded(self, name_of):
        """The message with every field it names written as name_of(field)."""
        return name_of(self.field) + " " + re.sub(r"`(\w+)`", lambda m: name_of(m[1]), self.message)


def check_positive(values, *names):
    """A ConfigError for the first named attribute of `values` that is not positive (nan included)."""
    for name in names:
        if not getattr(values, name) > 0:
            raise ConfigError(name, f"must be positive, got {getattr(values, name)}.")


def config_from_dict(cls, values):
    """A config dataclass from a checkpoint's `config` dict; unknown keys are an error that names them."""
    unknown = sorted(set(values) - {f.name for f in fields(cls)})
    if unknown:
        raise ValueError(f"The checkpoint's {cls.__name__} has fields this code does not know: {unknown}.")
    return cls(**values)
