# Images from a prompts file, one make target per prompt (the line number names the file).
#
#   make -f examples/prompts.mk -j4 MODEL=runs/emoji PROMPTS=examples/prompts.txt OUT=out
#
# Safe under make -j: each target writes its own file atomically. A rerun does no work twice.
# out/line-3-000000.png is the image of line 3 of the prompts file (blank lines and # comments count).

MODEL ?= runs/emoji
PROMPTS ?= examples/prompts.txt
OUT ?= out
SEED ?= 0
STEPS ?= 30
CFG ?= 7.5
DDPM ?= ddpm

LINES := $(shell grep -n -v -e '^[[:space:]]*$$' -e '^[[:space:]]*\#' $(PROMPTS) | cut -d: -f1)
SEED6 := $(shell printf '%06d' $(SEED))
IMAGES := $(foreach n,$(LINES),$(OUT)/line-$(n)-$(SEED6).png)

.PHONY: all clean
.DELETE_ON_ERROR:

all: $(IMAGES)

$(OUT)/line-%-$(SEED6).png: $(PROMPTS)
	$(DDPM) txt2img $(MODEL) "$$(sed -n '$*p' $(PROMPTS))" --name line-$* --seed $(SEED) --steps $(STEPS) --cfg $(CFG) -o $(OUT) --overwrite -q

clean:
	rm -f $(IMAGES)
