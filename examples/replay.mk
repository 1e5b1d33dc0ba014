# Replay a folder of ddpm PNGs with one setting changed (default: more steps), one make target per file.
#
#   make -f examples/replay.mk -j4 IN=samples OUT=samples-100 SET="steps=100"
#   make -f examples/replay.mk IN=samples OUT=ddim SET="sampler=ddim steps=50"
#
# Each IN/NAME.png becomes OUT/NAME.png: the same command, model, seed and settings, read from the
# image's metadata, with SET applied (space-separated KEY=VALUE; see `ddpm replay --help`).
# Safe under make -j: each target writes its own file atomically. A rerun does no work twice, and an
# image is replayed again when its original changes.

IN ?= samples
OUT ?= replay-more-steps
SET ?= steps=100
DDPM ?= ddpm

ORIGINALS := $(wildcard $(IN)/*.png)
IMAGES := $(patsubst $(IN)/%.png,$(OUT)/%.png,$(filter-out $(IN)/grid.png,$(ORIGINALS)))

.PHONY: all clean
.DELETE_ON_ERROR:

all: $(IMAGES)

$(OUT)/%.png: $(IN)/%.png
	$(DDPM) replay $< -o $(OUT) $(foreach s,$(SET),--set $(s)) --overwrite -q

clean:
	rm -f $(IMAGES)
