"""EMA weights: an exponential moving average of a model's parameters, for sampling and evaluation (off by default,
as in the paper; LlamaGen's --ema and Open-MAGVIT2's use_ema are what published numbers use)."""
from contextlib import contextmanager

import torch


class EMA:
    """ema = decay * ema + (1 - decay) * parameter after every optimizer step, in fp32.

    Its state dict is the model's, with the averaged parameters in place of the trained ones (buffers are the
    model's own), so a checkpoint's `ema` loads into the model like its `model` does.
    """

    def __init__(self, model, decay):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"The EMA decay must be between 0 and 1, got {decay}.")
        self.decay = decay
        self.names = [name for name, p in model.named_parameters() if p.requires_grad]
        self.params = [p.detach().float().clone() for name, p in model.named_parameters() if p.requires_grad]

    @torch.no_grad()
    def update(self, model):
        """One step of the average towards the model's current parameters (identical on every rank under DDP,
        whose ranks hold identical parameters)."""
        current = [p.detach().float() for p in model.parameters() if p.requires_grad]
        torch._foreach_lerp_(self.params, current, 1.0 - self.decay)

    def state_dict(self, model):
        """The model's state dict with the averaged parameters."""
        state = model.state_dict()
        state.update({name: p.to(state[name].dtype) for name, p in zip(self.names, self.params)})
        return state

    def load_state_dict(self, state):
        """Resume: the averaged parameters of a checkpoint's `ema`."""
        for name, p in zip(self.names, self.params):
            p.copy_(state[name])

    @contextmanager
    @torch.no_grad()
    def applied(self, model):
        """Within the block the model holds the averaged parameters (the training grids show them); its own after."""
        params = dict(model.named_parameters())
        trained = [params[name].clone() for name in self.names]
        for name, p in zip(self.names, self.params):
            params[name].copy_(p)
        try:
            yield model
        finally:
            for name, p in zip(self.names, trained):
                params[name].copy_(p)
