"""`imgstream COMMAND`: the dispatcher. It imports only the command module of the room that owns the
command asked for, so a crawler's light install never loads the worker's, the sink's or training's code."""

from __future__ import annotations

import argparse
import difflib
import importlib
import sys
from typing import Sequence

from imgstream.kafka_clients.errors import BrokerUnreachable, KafkaSetupError
from imgstream.schemas.config import ConfigError
from imgstream.schemas.flags import EXIT_KAFKA, EXIT_USAGE

# name -> (the module that owns it, a line of help). Each module has COMMANDS: name -> Command.
COMMANDS: dict[str, tuple[str, str]] = {
    "broker": ("imgstream.producer.commands", "Run the embedded Kafka-compatible broker (Tansu) on loopback."),
    "topics": ("imgstream.producer.commands", "Manage imgstream's topics."),
    "check": ("imgstream.producer.commands",
              "Preflight a cluster: login, topics, and read/write access to each."),
    "operations": ("imgstream.producer.commands", "Print the operation registry as JSON."),
    "submit": ("imgstream.producer.commands", "Submit images (files, folders, URLs) for analysis."),
    "caption-folder": ("imgstream.producer.commands", "Write a caption <name>.txt beside every image of a folder."),
    "replay": ("imgstream.producer.commands",
               "Re-publish selected requests to the replay topic (e.g. after a model change)."),
    "worker": ("imgstream.consumer.command", "Consume requests, run the task engine, publish results."),
    "sink": ("imgstream.sink.command", "Store the results topic in a database."),
    "search": ("imgstream.sink.command", "Find the stored images nearest to an image (pgvector, cosine distance)."),
    "train-classifiers": ("imgstream.training.command", "Train collection classifiers, bake them off against "
                          "stored versions, point best_models.json at the winners."),
}


def build_parser(command: str | None) -> argparse.ArgumentParser:
    """The parser of every command's name and help, with the arguments of `command` (if it is one)."""
    parser = argparse.ArgumentParser(
        prog="imgstream",
        description="Streaming image analysis on Kafka: requests in, one result event per task out.",
        epilog="Configuration: flags override IMGSTREAM_* environment variables "
        "(nested with '__', e.g. IMGSTREAM_KAFKA__BOOTSTRAP, IMGSTREAM_MODELS__WEIGHTS).",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == command:
            importlib.import_module(module).COMMANDS[name].configure(p)
    return parser


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """`argv` parsed as the command line would (argparse exits on a bad one): for checking command lines."""
    asked = next((item for item in argv if not item.startswith("-")), None)
    return build_parser(asked if asked in COMMANDS else None).parse_args(argv)


def _unknown_flags(parser: argparse.ArgumentParser, args: argparse.Namespace, extra: list[str]) -> str:
    """A usage message for flags the command does not know, each with the closest one it does."""
    command = parser
    for dest in ("command", "topics_command", "sink_command"):  # down to the parser that ran
        name = getattr(args, dest, None)
        actions = [a for a in command._actions if isinstance(a, argparse._SubParsersAction)]
        if name is None or not actions or name not in actions[0].choices:
            break
        command = actions[0].choices[name]
    known = [flag for action in command._actions for flag in action.option_strings]
    flags = [item for item in extra if item.startswith("-")]
    problems = []
    for item in flags or extra:  # a value after an unknown flag is not worth a line of its own
        flag = item.split("=", 1)[0]
        close = difflib.get_close_matches(flag, known, n=1, cutoff=0.5) if flag.startswith("-") else []
        problems.append(f"unknown {'flag' if flag.startswith('-') else 'argument'} {item}"
                        + (f" (did you mean {close[0]}?)" if close else ""))
    return f"{command.prog}: {'; '.join(problems)}; see {command.prog} --help"


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    asked = next((item for item in argv if not item.startswith("-")), None)
    parser = build_parser(asked if asked in COMMANDS else None)
    args, extra = parser.parse_known_args(argv)
    if extra:
        print(_unknown_flags(parser, args, extra), file=sys.stderr)
        return EXIT_USAGE
    command = importlib.import_module(COMMANDS[args.command][0]).COMMANDS[args.command]
    try:
        return command.run(args)
    except ConfigError as exc:  # a bad flag value or IMGSTREAM_* variable, for any command
        print(f"imgstream {args.command}: bad configuration: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KafkaSetupError as exc:  # the cluster refused a login, certificate, permission or topic
        print(f"imgstream {args.command}: {exc.message}", file=sys.stderr)
        return EXIT_KAFKA
    except BrokerUnreachable as exc:
        print(f"imgstream {args.command}: no Kafka broker answered: {exc}", file=sys.stderr)
        return EXIT_KAFKA
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
