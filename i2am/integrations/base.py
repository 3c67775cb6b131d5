"""What every model family of i2am.trace is: a small object that stands in on one denoiser's
attention layers for the length of a trace and undoes it (diffusers' ModelHook, DAAM's hookers).

A family instance belongs to one trace. It owns:
- its undo: ``install`` records every change it makes, ``restore`` takes them back in reverse
  order, also after a partial install or an exception in the traced block;
- its per-run state: what the last denoiser call said (latent size, step, token layout);
- how a call's inputs are read: ``read_inputs`` and ``timestep``.

The class attributes and classmethods say what the trace may ask before anything is changed.
"""


class Family:
    CFG_BATCH = True        # whether its pipelines batch [uncond, cond]
    NEEDS_REF_GRID = True   # whether ref_grid must be given (else the model's inputs say it)
    PROTOCOLS = ("paper",)  # the protocols (i2am.protocols) defined for the family

    def __init__(self, denoiser):
        self.denoiser = denoiser
        self.recording = None  # the trace recording into the maps, set by install
        self._undo = []        # callables that take back what install changed

    @classmethod
    def matches(cls, obj):
        """Whether obj is a pipeline or a denoiser of the family."""
        raise NotImplementedError

    @classmethod
    def split(cls, obj):
        """(pipeline or None, its denoiser) from a pipeline or a bare denoiser."""
        raise NotImplementedError

    def attention_layers(self, attention="cross"):
        """{name: attention module} of the denoiser's layers that can be recorded; attention:
        "cross" or "self" where the family has both kinds (a UNet's attn2 and attn1)."""
        raise NotImplementedError

    def install(self, recording, layers):
        """Stand in on `layers` ({name: module}) so that their attention is recorded by
        `recording` (its ``attend``); every change is undone by restore()."""
        raise NotImplementedError

    def restore(self):
        """Put the model back exactly as install found it."""
        while self._undo:
            self._undo.pop()()
        self.recording = None

    def read_inputs(self, args, kwargs):
        """One denoiser call's inputs (positional args and keywords): sets the recording's latent
        size (and the reference grid when the model says it); returns whether the call is a new
        step."""
        raise NotImplementedError

    def timestep(self, args, kwargs):
        """The call's timestep in the units of pipe.scheduler.timesteps (None: not given)."""
        raise NotImplementedError
