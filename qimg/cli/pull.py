"""`qimg pull REPO`: fetch a model from the Hugging Face Hub into the local cache (resumable)."""

from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("pull", help="download a model repo (or some of its files) into the Hugging Face cache",
                       description="Fetch REPO from the Hugging Face Hub into the standard cache ($HF_HUB_CACHE, "
                                   "$HF_HOME/hub or ~/.cache/huggingface/hub), resuming an interrupted download; "
                                   "then --model REPO works offline.")
    p.add_argument("repo", help="a repo id such as Qwen/Qwen-Image-2.1")
    p.add_argument("--revision", default=None, help="a branch, tag or commit (default: main)")
    p.add_argument("--include", action="append", default=None, metavar="PATTERN",
                   help="only files matching this glob, e.g. 'transformer/*' or 'qwen-image-Q4_K_M.gguf' "
                        "(repeatable)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(handler=run_pull)


def run_pull(args) -> int:
    from qimg.loading.pull import pull

    folder = pull(args.repo, revision=args.revision, include=args.include, progress=not args.quiet)
    files = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
    print(f"{args.repo}: {len(files)} files in {folder}")
    if (folder / "model_index.json").is_file():
        print(f"use it offline: qimg generate PROMPT --model {args.repo}")
    return 0
