// A persistent thread pool for the CPU kernels: workers spin briefly between calls (a decode step
// makes ~200 kernel calls a few microseconds apart), then sleep, so an idle process costs nothing.
// Each call hands tasks [0, n) to up to `threads` threads through an atomic counter. The caller
// starts on the tasks at once and never waits for a worker that has not joined: on a machine shared
// with other work a descheduled worker costs nothing but its share, instead of stalling the call.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
static inline void tp_relax() { _mm_pause(); }
#elif defined(__aarch64__)
static inline void tp_relax() { asm volatile("yield"); }
#else
static inline void tp_relax() {}
#endif

namespace tp {

class Pool {
 public:
  using Fn = void (*)(void* ctx, int64_t task);

  static Pool& get() {
    static Pool* pool = new Pool();  // never destroyed: workers may outlive static destructors
    return *pool;
  }

  // Run fn(ctx, t) for every t in [0, n_tasks) on min(threads, n_tasks) threads.
  void run(int threads, int64_t n_tasks, Fn fn, void* ctx) {
    if (threads > n_tasks) threads = static_cast<int>(n_tasks);
    if (threads <= 1) {
      for (int64_t t = 0; t < n_tasks; ++t) fn(ctx, t);
      return;
    }
    std::lock_guard<std::mutex> one_job(run_mu_);  // callers on several XLA threads take turns
    ensure_workers(threads - 1);
    fn_ = fn;
    ctx_ = ctx;
    n_tasks_ = n_tasks;
    next_.store(0, std::memory_order_relaxed);
    open_.store(true, std::memory_order_seq_cst);  // publishes the fields above to joining workers
    uint64_t job = ++job_id_;
    for (int w = 0; w < threads - 1; ++w) workers_[w]->ticket.store(job, std::memory_order_seq_cst);
    if (sleepers_.load(std::memory_order_seq_cst) > 0) {
      std::lock_guard<std::mutex> lock(sleep_mu_);
      wake_.notify_all();
    }
    work();
    open_.store(false, std::memory_order_seq_cst);
    while (joined_.load(std::memory_order_seq_cst) != 0) tp_relax();  // only workers inside work()
  }

 private:
  struct Worker {
    std::atomic<uint64_t> ticket{0};
    std::thread thread;
  };

  void work() {
    for (int64_t t; (t = next_.fetch_add(1, std::memory_order_relaxed)) < n_tasks_;) fn_(ctx_, t);
  }

  void ensure_workers(int n) {
    while (static_cast<int>(workers_.size()) < n) {
      auto worker = std::make_unique<Worker>();
      Worker* self = worker.get();
      worker->thread = std::thread([this, self] { loop(self); });
      worker->thread.detach();
      workers_.push_back(std::move(worker));
    }
  }

  void loop(Worker* self) {
    uint64_t seen = 0;
    for (;;) {
      auto start = std::chrono::steady_clock::now();
      for (int i = 0; self->ticket.load(std::memory_order_acquire) == seen; ++i) {
        tp_relax();
        if ((i & 255) == 255 && std::chrono::steady_clock::now() - start > std::chrono::microseconds(kSpinMicros)) {
          std::unique_lock<std::mutex> lock(sleep_mu_);
          sleepers_.fetch_add(1, std::memory_order_seq_cst);
          wake_.wait(lock, [&] { return self->ticket.load(std::memory_order_seq_cst) != seen; });
          sleepers_.fetch_sub(1, std::memory_order_seq_cst);
        }
      }
      seen = self->ticket.load(std::memory_order_acquire);
      // Join only a job still open: counted first, so the caller cannot return (and start the
      // next job) while this worker may still read the job's fields.
      joined_.fetch_add(1, std::memory_order_seq_cst);
      if (open_.load(std::memory_order_seq_cst)) work();
      joined_.fetch_sub(1, std::memory_order_seq_cst);
    }
  }

  static constexpr int kSpinMicros = 300;
  std::mutex run_mu_;
  std::vector<std::unique_ptr<Worker>> workers_;
  std::mutex sleep_mu_;
  std::condition_variable wake_;
  std::atomic<int> sleepers_{0};
  uint64_t job_id_ = 0;
  Fn fn_ = nullptr;
  void* ctx_ = nullptr;
  int64_t n_tasks_ = 0;
  std::atomic<int64_t> next_{0};
  std::atomic<bool> open_{false};
  std::atomic<int> joined_{0};
};

// Run body(t) for t in [0, n) on `threads` threads; body is any callable.
template <class Body>
void parallel_for(int threads, int64_t n, const Body& body) {
  Pool::get().run(threads, n, [](void* ctx, int64_t t) { (*static_cast<const Body*>(ctx))(t); },
                  const_cast<Body*>(&body));
}

}  // namespace tp
