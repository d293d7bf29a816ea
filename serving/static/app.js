// The page: submit a job (multipart, so an image file goes as is), poll its status, play the video.
// With an API key the video is fetched with the bearer header and shown through an object URL.
"use strict";
const $ = (id) => document.getElementById(id);
const keyInput = $("apiKey");
keyInput.value = localStorage.getItem("fdreamer.apiKey") || "";
keyInput.addEventListener("change", () => { localStorage.setItem("fdreamer.apiKey", keyInput.value); loadRecent(); loadDefaults(); });
let current = null;   // job id being watched
let objectUrl = null;

function headers() {
  const key = keyInput.value.trim();
  return key ? { Authorization: "Bearer " + key } : {};
}

async function api(path, options = {}) {
  const res = await fetch(path, { ...options, headers: { ...headers(), ...(options.headers || {}) } });
  if (!res.ok) {
    let msg = res.status + " " + res.statusText;
    try { const body = await res.json(); msg = `${res.status} ${body.error_type}: ${body.error}`; } catch (e) { /* not JSON */ }
    const err = new Error(msg); err.status = res.status; throw err;
  }
  return res;
}

function showStatus(rec) {
  const p = rec.progress || {};
  const phase = p.phase ? ` (${p.phase} ${p.step || 0}/${p.total || "?"})` : "";
  $("status").textContent = `Job ${rec.id}: ${rec.status}${rec.status === "running" || rec.status === "queued" ? phase : ""}`;
  $("progress").value = p.total ? (p.step || 0) / p.total : 0;
  if (rec.status === "succeeded") $("progress").value = 1;
  $("error").textContent = rec.error ? `${rec.error.error_type}: ${rec.error.error}` : "";
  const t = rec.timings || {};
  $("meta").textContent = `seed ${rec.seed}` + (t.total !== undefined ? ` · ${t.total.toFixed(2)} s` : "") +
    (rec.params ? ` · ${rec.params.num_frames} frames ${rec.params.width}x${rec.params.height}, ${rec.params.num_inference_steps} steps` : "");
}

async function playVideo(id) {
  const res = await api(`/v1/videos/${id}/content`);
  const blob = await res.blob();
  if (objectUrl) URL.revokeObjectURL(objectUrl);
  objectUrl = URL.createObjectURL(blob);
  const video = $("video");
  video.src = objectUrl;
  video.dataset.jobId = id;
  try { await video.play(); } catch (e) { /* autoplay may be refused; the controls still work */ }
}

async function watch(id) {
  current = id;
  $("job").hidden = false;
  $("cancel").disabled = false;
  while (current === id) {
    let rec;
    try { rec = await (await api(`/v1/videos/${id}`)).json(); }
    catch (e) { $("error").textContent = e.message; break; }
    showStatus(rec);
    if (["succeeded", "failed", "cancelled"].includes(rec.status)) {
      $("cancel").disabled = true;
      if (rec.status === "succeeded") await playVideo(id);
      loadRecent();
      break;
    }
    await new Promise((r) => setTimeout(r, 400));
  }
}

$("form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const form = new FormData();
  form.append("prompt", $("prompt").value);
  for (const el of $("advanced").querySelectorAll("input, select")) {
    if (el.value !== "") form.append(el.name, el.value);
  }
  const file = $("image").files[0];
  if (file) form.append("image", file, file.name);
  $("submit").disabled = true;
  $("error").textContent = "";
  $("job").hidden = false;
  $("status").textContent = "submitting…";
  try {
    const job = await (await api("/v1/videos", { method: "POST", body: form })).json();
    loadRecent();
    await watch(job.id);
  } catch (e) {
    $("status").textContent = "";
    $("error").textContent = e.message;
  } finally {
    $("submit").disabled = false;
  }
});

$("cancel").addEventListener("click", async () => {
  if (!current) return;
  try { await api(`/v1/videos/${current}`, { method: "DELETE" }); } catch (e) { $("error").textContent = e.message; }
});

async function loadRecent() {
  const list = $("recent");
  try {
    const body = await (await api("/v1/videos?limit=20")).json();
    list.replaceChildren(...body.data.map((rec) => {
      const li = document.createElement("li");
      const a = document.createElement("a");
      a.textContent = `${rec.id.slice(0, 8)} · ${rec.status} · ${rec.mode} · ${rec.params.prompt.slice(0, 60)}`;
      a.addEventListener("click", () => watch(rec.id));
      li.append(a);
      return li;
    }));
  } catch (e) {
    list.replaceChildren(Object.assign(document.createElement("li"), { textContent: e.message }));
  }
}

// Empty fields take the server's defaults (GET /v1/limits): shown as the fields' placeholders.
async function loadDefaults() {
  try {
    const { defaults } = await (await api("/v1/limits")).json();
    for (const el of $("advanced").querySelectorAll("input")) {
      if (defaults[el.name] !== undefined) el.placeholder = String(defaults[el.name]);
    }
  } catch (e) { /* no key yet: the placeholders stay "default" */ }
}

$("refresh").addEventListener("click", loadRecent);
loadRecent();
loadDefaults();
