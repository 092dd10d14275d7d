"""One process of a multi-process test run (tests/test_distributed.py), launched like torchrun does.

    python tests/dist_worker.py [--die-rank R --die-at K] -- finetune ...   # the CLI, in this rank
    python tests/dist_worker.py eval CHECKPOINT FOLDER RES OUT.json          # sharded evaluation

The launcher sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT. ``--die-rank R``
makes rank R kill itself with SIGKILL (as the OOM killer would) when its K-th fine-tune
starts: the fault the clean-failure test injects.
"""

from __future__ import annotations

import os
import signal
import sys


def _die_on_finetune(at: int) -> None:
    import fixres_deploy.fixres.finetune as ft

    real = ft.fixres_finetune
    calls = [0]

    def dying(*args, **kwargs):
        calls[0] += 1
        if calls[0] >= at:
            os.kill(os.getpid(), signal.SIGKILL)
        return real(*args, **kwargs)

    ft.fixres_finetune = dying


def _sharded_eval(checkpoint: str, folder: str, res: str, out: str) -> int:
    from fixres_deploy.core import distributed
    from fixres_deploy.core.preprocess import resolve_preprocess
    from fixres_deploy.core.utils import write_json
    from fixres_deploy.fixres.evaluate import evaluate_model, index_for_model
    from fixres_deploy.models.registry import load_model

    with distributed.session():
        loaded = load_model(None, None, checkpoint)
        cfg = resolve_preprocess(loaded.preprocess, test_input_size=int(res))
        index = index_for_model(folder, loaded)
        result = evaluate_model(loaded.model, index, cfg, batch_size=8, workers=0, shard=distributed.shard())
        distributed.main_only(lambda: write_json(out, result.to_dict(with_per_image=True)))
    return 0


def main(argv: list[str]) -> int:
    if argv and argv[0] == "eval":
        return _sharded_eval(*argv[1:5])
    opts, cli = (argv[: argv.index("--")], argv[argv.index("--") + 1 :]) if "--" in argv else ([], argv)
    if "--die-rank" in opts:
        die_rank = int(opts[opts.index("--die-rank") + 1])
        die_at = int(opts[opts.index("--die-at") + 1]) if "--die-at" in opts else 1
        if int(os.environ.get("RANK", "0")) == die_rank:
            _die_on_finetune(die_at)
    from fixres_deploy.cli.app import main as cli_main

    return cli_main(cli)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
