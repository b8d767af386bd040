// The model picker: a button naming the model, opening a short menu of every model. A model
// this visitor may not use is shown too, locked, saying why and offering sign-in; signed in,
// each model has a line on what it is for (GET /api/models).

/** The picker inside `root` (rendered by chat.html). */
export class ModelPicker {
  /**
   * @param {HTMLElement} root the `.model-picker` element
   * @param {object} handlers
   * @param {(model: string) => void} handlers.onChange a model was chosen
   * @param {() => void} handlers.onDone the menu closed on a choice (click or Enter)
   */
  constructor(root, { onChange, onDone }) {
    this.root = root;
    this.onChange = onChange;
    this.onDone = onDone;
    this.button = root.querySelector(".model-picker__button");
    this.menu = root.querySelector(".model-menu");
    this.current = root.querySelector("#model-current");
    this.value = root.dataset.value || "haiku";
    this.button.addEventListener("click", () => this.toggle());
    // A click on a model chooses it and closes the menu; arrow keys move the choice, as in
    // any radio group, and Enter (or Escape) closes the menu.
    let pointer = false;
    this.menu.addEventListener("pointerdown", () => {
      pointer = true;
    });
    this.menu.addEventListener("change", (event) => {
      if (event.target.name !== "model") return;
      this.set(event.target.value);
      this.onChange(this.value);
      if (pointer) {
        this.close({ focus: false });
        this.onDone();
      }
      pointer = false;
    });
    this.menu.addEventListener("keydown", (event) => {
      pointer = false;
      if (event.key === "Escape") {
        // The page's Escape stops a running answer; here it only closes the menu.
        event.preventDefault();
        event.stopPropagation();
        this.close({ focus: true });
      } else if (event.key === "Enter" && event.target.name === "model") {
        event.preventDefault();
        this.close({ focus: false });
        this.onDone();
      }
    });
    document.addEventListener("pointerdown", (event) => {
      if (!this.menu.hidden && !root.contains(event.target)) this.close({ focus: false });
    });
    root.addEventListener("focusout", (event) => {
      if (!this.menu.hidden && event.relatedTarget && !root.contains(event.relatedTarget)) this.close({ focus: false });
    });
  }

  /** Show the models this visitor may use, and a line about each (from GET /api/models). */
  describe(models) {
    for (const model of models) {
      const option = this.menu.querySelector(`.model-option[data-model="${CSS.escape(model.id)}"]`);
      if (!option) continue;
      const radio = option.querySelector("input");
      radio.disabled = !model.allowed;
      option.dataset.locked = String(!model.allowed);
      const about = option.querySelector(".model-option__description");
      about.textContent = model.description ?? "";
      if (model.allowed) radio.setAttribute("aria-describedby", about.id);
    }
  }

  /** Show this model as chosen (without telling onChange). */
  set(model) {
    const radio = this.menu.querySelector(`input[value="${CSS.escape(model)}"]`);
    if (!radio) return;
    radio.checked = true;
    this.value = model;
    this.root.dataset.value = model;
    const name = radio.closest(".model-option").querySelector(".model-option__name").textContent;
    if (this.current.textContent !== name) this.current.textContent = name;
  }

  get isOpen() {
    return !this.menu.hidden;
  }

  toggle() {
    if (this.isOpen) this.close({ focus: true });
    else this.open();
  }

  open() {
    this.menu.hidden = false;
    this.button.setAttribute("aria-expanded", "true");
    const checked = this.menu.querySelector("input:checked:not(:disabled)") ?? this.menu.querySelector("input:not(:disabled)");
    checked?.focus();
  }

  close({ focus }) {
    this.menu.hidden = true;
    this.button.setAttribute("aria-expanded", "false");
    if (focus) this.button.focus();
  }
}
