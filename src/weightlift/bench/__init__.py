"""The benchmark behind ``weightlift bench`` and ``weightlift demo``: synthetic checkpoints
(``synthetic``), the loaders measured (``loaders``), the fresh-process child (``child``), the
interleaving runner (``runner``), statistics (``stats``) and output (``report``)."""
