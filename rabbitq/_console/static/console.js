// The rabbitq console's only script: tick or untick a page of tasks at once.
document.addEventListener("DOMContentLoaded", () => {
  const all = document.getElementById("select-all");
  if (all) {
    all.addEventListener("change", () => {
      for (const box of document.querySelectorAll('#tasks input[name="id"]')) box.checked = all.checked;
    });
  }
});
