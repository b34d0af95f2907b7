// fluxport pages: copy buttons on model pages, and the playground (form -> job -> Server-Sent Events).
// Without this script everything still works: the playground form posts and the page shows the result.
"use strict";

for (const button of document.querySelectorAll("button.copy")) {
  const source = document.getElementById(button.dataset.copy);
  if (!source || !navigator.clipboard) continue;
  button.hidden = false;
  button.addEventListener("click", async () => {
    await navigator.clipboard.writeText(source.innerText);
    button.textContent = "Copied";
    setTimeout(() => { button.textContent = "Copy"; }, 1500);
  });
}

const form = document.getElementById("pg");
if (form) playground(form);

function playground(form) {
  const $ = (id) => document.getElementById(id);
  const model = $("model"), files = $("image"), go = $("go"), mode = $("mode");
  const box = $("progress-box"), bar = $("progress"), label = $("progress-label"), preview = $("preview");
  const errorBox = $("error"), results = $("results"), result = $("result");
  let source = null;

  const syncNoise = () => {
    const option = model.options[model.selectedIndex];
    $("noise").hidden = !option || option.dataset.noise !== "true";
  };
  const syncMode = () => {
    const edit = files.files.length > 0;
    go.textContent = edit ? "Edit" : "Generate";
    mode.textContent = edit ? `Edit with ${files.files.length} reference image${files.files.length > 1 ? "s" : ""}` : "Text to image";
  };
  model.addEventListener("change", syncNoise);
  files.addEventListener("change", syncMode);
  syncNoise();
  syncMode();

  const showError = (err) => {
    errorBox.textContent = err.message || "Something went wrong.";
    if (err.param) {
      const span = document.createElement("span");
      span.className = "param";
      span.append(" (field: ", Object.assign(document.createElement("code"), { textContent: err.param }), ")");
      errorBox.append(span);
      const field = document.getElementById(err.param);
      if (field) field.setAttribute("aria-invalid", "true");
    }
    errorBox.hidden = false;
    box.hidden = true;
    errorBox.scrollIntoView({ behavior: "smooth", block: "nearest" });
  };
  const busy = (on) => {
    go.disabled = on;
    go.setAttribute("aria-busy", on ? "true" : "false");
  };

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    if (source) source.close();
    errorBox.hidden = true;
    errorBox.textContent = "";
    for (const el of form.querySelectorAll("[aria-invalid]")) el.removeAttribute("aria-invalid");
    label.textContent = "Submitting…";
    bar.removeAttribute("value");
    preview.hidden = true;
    box.hidden = false;
    busy(true);
    let response;
    try {
      response = await fetch("/playground/api/jobs", { method: "POST", body: new FormData(form) });
    } catch (e) {
      busy(false);
      showError({ message: `Could not reach the server: ${e.message}` });
      return;
    }
    const body = await response.json().catch(() => ({}));
    if (!response.ok) {
      busy(false);
      const err = body.error || { message: `HTTP ${response.status}` };
      if (response.status === 429 && response.headers.get("retry-after") && !/Try again/.test(err.message)) {
        err.message += ` Try again in ${response.headers.get("retry-after")} s.`;
      }
      showError(err);
      return;
    }
    label.textContent = "Queued…";
    follow(body.events);
  });

  function follow(url) {
    source = new EventSource(url);
    source.addEventListener("progress", (e) => {
      const p = JSON.parse(e.data);
      if (p.stage === "step" && p.total) {
        bar.max = p.total;
        bar.value = p.step;
        label.textContent = `Step ${p.step} of ${p.total}`;
      } else {
        bar.removeAttribute("value");
        const words = { queued: "Queued", loading: "Loading the model", decoding: "Decoding", done: "Finishing" }[p.stage] || p.stage;
        label.textContent = p.message ? `${words}: ${p.message}…` : `${words}…`;
      }
      if (p.preview) {
        preview.src = p.preview;
        preview.hidden = false;
      }
    });
    source.addEventListener("partial", (e) => {
      const p = JSON.parse(e.data);
      preview.src = p.image;
      preview.alt = `Partial image ${p.index + 1} of ${p.of}, after step ${p.step} of ${p.total}`;
      preview.hidden = false;
    });
    source.addEventListener("result", (e) => {
      source.close();
      source = null;
      busy(false);
      box.hidden = true;
      render(JSON.parse(e.data));
    });
    source.addEventListener("error", (e) => {
      // A named "error" event carries data; a bare one is the connection failing.
      source.close();
      source = null;
      busy(false);
      if (e.data) showError(JSON.parse(e.data).error || {});
      else showError({ message: "Lost the connection to the server while generating." });
    });
  }

  const ms = (v) => (v == null ? "–" : v >= 1000 ? `${(v / 1000).toFixed(1)} s` : `${Math.round(v)} ms`);
  const usd = (v) => (v == null ? "–" : v === 0 ? "free" : `$${v < 0.01 ? String(+v.toFixed(6)) : v.toFixed(3)}`);

  function render(r) {
    result.replaceChildren();
    const dl = document.createElement("dl");
    dl.className = "meta";
    const rows = [["Provider", r.provider, "provider"], ["Latency", ms(r.latency_ms), "latency"], ["Size", r.size, "size"],
      ["Cost", usd(r.cost_usd), "cost"], ["Revised prompt", r.revised_prompt || "–", "revised"]];
    for (const [k, v, key] of rows) {
      dl.append(Object.assign(document.createElement("dt"), { textContent: k }));
      const dd = Object.assign(document.createElement("dd"), { textContent: v });
      dd.dataset.k = key;
      dl.append(dd);
    }
    const list = document.createElement("ul");
    list.className = "images";
    r.images.forEach((img, i) => {
      const li = document.createElement("li");
      const fig = document.createElement("figure");
      const link = Object.assign(document.createElement("a"), { href: img.url });
      link.append(Object.assign(document.createElement("img"), { src: img.url, alt: `Generated image ${i + 1} (seed ${img.seed})` }));
      const cap = document.createElement("figcaption");
      const dl2 = Object.assign(document.createElement("a"), { href: img.url, textContent: `Download ${r.output_format}` });
      dl2.download = img.download;
      cap.append(`seed ${img.seed} · `, dl2);
      fig.append(link, cap);
      li.append(fig);
      list.append(li);
    });
    result.append(dl, list);
    results.hidden = false;
    results.scrollIntoView({ behavior: "smooth", block: "start" });
  }
}
