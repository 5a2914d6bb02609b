#!/bin/sh
# One image serves several services, so the container says which one through
# FREEMASK_SERVICE (the image's HEALTHCHECK reads the same variable). With
# arguments it runs that freemask command instead, for one-shot jobs:
#   docker run IMAGE topics create
#   docker run IMAGE placement export --target production --out /var/lib/freemask/triton
set -eu

if [ "$#" -eq 0 ]; then
    if [ -z "${FREEMASK_SERVICE:-}" ]; then
        echo "freemask-entrypoint: set FREEMASK_SERVICE to the service this container runs" \
            "(attention_mask, thesaurus, placement, harmonization, scoring or coordinator)," \
            "or pass a freemask command" >&2
        exit 64
    fi
    set -- serve "$FREEMASK_SERVICE"
fi
# exec: freemask replaces this shell, so the SIGTERM that stops the container
# reaches it and it shuts down gracefully.
exec freemask "$@"
